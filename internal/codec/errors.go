package codec

import (
	"errors"
)

// ErrUndecodable wraps every failure to understand a body: one outpost
// cannot file, which its recorder drops rather than fail the client.
var ErrUndecodable = errors.New("undecodable body")
