// Package codec reads and writes what kube-apiserver sends: JSON,
// protobuf (its envelope, lists item by item, and kinds outpost has no Go
// type for, from their ObjectMeta), CBOR, gzip aside, and watch streams.
// It turns answers into store objects (name, namespace, labels, the field
// values selectors need, and the object as JSON and, when the apiserver
// sent it, as protobuf) and assembles answers from stored objects in the
// encoding a client's Accept header asks for, byte for byte as the
// apiserver writes them where it can.
//
// It knows no HTTP handler and no view: the recorder and the offline
// reader use it, and it uses only the store's Object.
package codec
