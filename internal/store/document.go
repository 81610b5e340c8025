package store

import (
	"bytes"
	"fmt"
	"slices"
)

// PutDoc stores a non-resource answer (discovery, /version, OpenAPI) under
// key, replacing any earlier one. The record is the content type,
// length-prefixed, then the body.
func (tx *Tx) PutDoc(key, contentType string, body []byte) error {
	if key == "" {
		return fmt.Errorf("storing document: %w: empty key", ErrInvalidKey)
	}
	rec := make([]byte, 0, len(contentType)+len(body)+4)
	rec = appendString(rec, contentType)
	rec = append(rec, body...)
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
	r := reader{b: rec}
	ct := r.bytes("document")
	if r.err != nil {
		return "", nil, false, fmt.Errorf("reading document %s: %w", key, r.err)
	}
	body = slices.Clone(r.b)
	if body == nil {
		body = []byte{}
	}
	return string(ct), body, true, nil
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
		r := reader{b: rec}
		ct := r.bytes("document")
		if r.err != nil {
			return fmt.Errorf("reading document %s: %w", k, r.err)
		}
		if err := fn(string(k), string(ct), slices.Clone(r.b)); err != nil {
			return err
		}
	}
	return nil
}
