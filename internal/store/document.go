package store

import (
	"bytes"
	"fmt"
	"slices"
)

// PutDoc stores a non-resource answer (discovery, /version, OpenAPI) under
// key, replacing any earlier one. The record is the content type,
// length-prefixed, then the body, sealed when Options.Sealed names key.
func (tx *Tx) PutDoc(key, contentType string, body []byte) error {
	if key == "" {
		return fmt.Errorf("storing document: %w: empty key", ErrInvalidKey)
	}
	sealed := tx.seal.doc(key)
	n := len(contentType) + len(body) + 4
	if sealed {
		n += 64 // room for the Sealer's overhead (36 bytes with seal.Key)
	}
	rec := make([]byte, 0, n)
	rec = appendString(rec, contentType)
	if sealed {
		rec = tx.seal.s.Seal(rec, body, tx.adFor(adDoc, []byte(key)))
	} else {
		rec = append(rec, body...)
	}
	if err := tx.docs.Put([]byte(key), rec); err != nil {
		return fmt.Errorf("storing document %s: %w", key, err)
	}
	return nil
}

// Doc returns the document stored under key. body is a copy.
func (tx *Tx) Doc(key string) (contentType string, body []byte, ok bool, err error) {
	if key == "" {
		return "", nil, false, nil
	}
	rec := tx.docs.Get([]byte(key))
	if rec == nil {
		return "", nil, false, nil
	}
	ct, body, err := tx.decodeDoc([]byte(key), rec)
	if err != nil {
		return "", nil, false, fmt.Errorf("reading document %s: %w", key, err)
	}
	return ct, body, true, nil
}

// decodeDoc decodes the document record rec stored under key, opening its
// body when sealed. body is a copy.
func (tx *Tx) decodeDoc(key, rec []byte) (contentType string, body []byte, err error) {
	r := reader{b: rec}
	ct := r.bytes("document")
	if r.err != nil {
		return "", nil, r.err
	}
	if tx.seal != nil && tx.seal.doc(string(key)) {
		body, err = tx.openData(nil, r.b, tx.adFor(adDoc, key))
		if err != nil {
			return "", nil, err
		}
	} else {
		body = slices.Clone(r.b)
	}
	if body == nil {
		body = []byte{}
	}
	return string(ct), body, nil
}

// DeleteDoc removes the document under key; a missing one is no error.
func (tx *Tx) DeleteDoc(key string) error {
	if key == "" {
		return nil
	}
	if err := tx.docs.Delete([]byte(key)); err != nil {
		return fmt.Errorf("deleting document %s: %w", key, err)
	}
	return nil
}

// Docs calls fn for every document whose key starts with prefix, in key
// order, until fn returns an error (returned). body is a copy.
func (tx *Tx) Docs(prefix string, fn func(key, contentType string, body []byte) error) error {
	c := tx.docs.Cursor()
	p := []byte(prefix)
	for k, rec := c.Seek(p); k != nil && bytes.HasPrefix(k, p); k, rec = c.Next() {
		ct, body, err := tx.decodeDoc(k, rec)
		if err != nil {
			return fmt.Errorf("reading document %s: %w", k, err)
		}
		if err := fn(string(k), ct, body); err != nil {
			return err
		}
	}
	return nil
}
