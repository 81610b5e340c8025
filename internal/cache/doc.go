// Package cache records what the apiservers answered and answers from those
// records when no apiserver can. It is what lets a node component restart
// while the cloud is unreachable and get back exactly what it saw before:
// "stale but previously-valid state" instead of nothing.
//
// Recording never slows or fails a client: the proxied body is copied into a
// bounded buffer (Tee), decoded off the request path, and written to the
// store by one writer goroutine in batched transactions. When recording falls
// behind or fails, the copy is dropped and the view is marked stale.
//
// Answering follows the apiserver's rules: label and field selectors,
// limit/continue, resourceVersion matching, and the encoding the client asked
// for (JSON, protobuf, CBOR, PartialObjectMetadata, Table).
package cache
