package codec

import (
	"mime"
	"strings"
)

// Accept describes what the client asked for in its Accept header.
type Accept struct {
	// As is the transformation asked first: "", "Table",
	// "PartialObjectMetadata" or "PartialObjectMetadataList".
	As string
	// PlainJSON is true when a plain application/json answer is acceptable
	// (kubectl asks for a Table but accepts JSON).
	PlainJSON bool
	// Media is the preferred media type without transformation.
	Media string
}

// ParseAccept reads an Accept header: the first transformation asked
// (as=Table, as=PartialObjectMetadata…), whether plain JSON would do, and
// the preferred media type.
func ParseAccept(h string) Accept {
	var a Accept
	if strings.TrimSpace(h) == "" {
		return Accept{PlainJSON: true, Media: MediaJSON}
	}
	for part := range strings.SplitSeq(h, ",") {
		part = strings.TrimSpace(part)
		var mt string
		var params map[string]string
		if strings.IndexByte(part, ';') < 0 {
			// No parameters, as clients send most media types: no need
			// for the parser's allocations.
			mt = strings.ToLower(part)
		} else {
			var err error
			if mt, params, err = mime.ParseMediaType(part); err != nil {
				continue
			}
		}
		if as := params["as"]; as != "" {
			if a.As == "" && a.Media == "" {
				a.As = as
				a.Media = mt
			}
			continue
		}
		switch mt {
		case MediaJSON, "*/*", "application/*":
			a.PlainJSON = true
			if a.Media == "" {
				a.Media = MediaJSON
			}
		case MediaProtobuf, MediaCBOR:
			if a.Media == "" {
				a.Media = mt
			}
		}
	}
	if a.Media == "" {
		a.Media = MediaJSON
	}
	return a
}

// Media types outpost decodes.
const (
	MediaJSON     = "application/json"
	MediaProtobuf = "application/vnd.kubernetes.protobuf"
	MediaCBOR     = "application/cbor"
)

func MediaType(contentType string) string {
	switch contentType {
	case MediaJSON, MediaProtobuf, MediaCBOR: // as the apiserver sends them
		return contentType
	}
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return contentType
	}
	return mt
}
