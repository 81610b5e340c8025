// Package store is outpost's durable cache: every object, list and watch
// answer the node's components received, kept in one bbolt file so that
// when the cloud is unreachable — even across a reboot — they get back
// exactly what they saw before the cut. It knows no HTTP: the cache package
// decodes answers into Objects and Views and serves them back from here.
//
// # Objects and views
//
// An Object is stored once per (Resource, namespace, name), with its
// resourceVersion, labels, field-selector values and JSON body, however
// many callers read it. A View records what one caller identity read with
// one request signature (resource, namespace, name, label and field
// selector): its members, the list's resourceVersion and kind, and when it
// was refreshed. A list answer replaces its view in one transaction
// (ReplaceView); watch events are applied in batches, one transaction per
// batch (Apply), and move objects in and out of every view of the resource
// whose namespace, name and selectors they now match, so that one
// component's watch keeps another's views current. An older
// resourceVersion never overwrites a newer one, and an object not stored
// that comes in an answer older than a whole view does not join that view:
// the view saw it deleted (answers arrive out of order over different
// connections). Each object counts the views holding it and is deleted
// when the last lets it go.
//
// Non-resource answers (discovery, /version, OpenAPI) are Docs, stored by
// key.
//
// # Sealing
//
// With Options.Sealer, the Data of the objects of the resources
// Options.Sealed names (Secrets), and the bodies of the documents under
// its prefixes (service-account tokens, Tables), are encrypted and
// authenticated, each bound to its key in the file: every method seals
// on write and opens on read, so callers never see the difference. What
// views are selected on — names, labels, field values, resourceVersions —
// stays in clear. An unchanged object is compared in clear and not
// rewritten, as without sealing. The meta bucket records the key's
// fingerprint and the rule; Open drops what a changed setting would serve
// wrongly and rewrites the file so that no plaintext is left in its free
// pages (see Options.Sealer).
//
// # Crash safety
//
// Everything goes through bbolt transactions, which commit with fsync
// (unless Options.NoSync): after a crash at any point the file holds each
// view either as it was before a replace or batch, or as it was after,
// never in between, and no object is half written. TestCrash kills a
// writer at random moments to check this. A file that cannot be read, or
// has another format version, is moved aside at Open and the cache starts
// empty (see Open). A page damaged where Open does not look is found by
// Run, which rebuilds the file from what still reads (see Run).
//
// # Transactions
//
// Each method of Store runs one transaction. Store.Update and Store.Read
// run a function in one transaction, with the same methods on Tx, for
// callers that must read several things from one snapshot or write several
// atomically (a view and the answer to its List, say).
//
// # Layout
//
// Buckets and their keys; lp(s) is s prefixed with its length as a uvarint,
// which keeps composite keys unambiguous and makes "all views of a
// resource" and "all views of an identity of a resource" key prefixes:
//
//	meta     "format"  -> "1" (formatVersion), or "2" (formatSealed) when
//	                      "seal" is set; Open refuses any other
//	         "objects" -> uint64 big endian: number of objects
//	         "views"   -> uint64 big endian: number of views
//	         "seal"    -> version byte (1) | lp(key fingerprint)
//	                      | uvarint n, n × lp(sealed resource)
//	                      | uvarint m, m × lp(sealed doc prefix);
//	                      absent: nothing is sealed
//	         "scrub"   -> present while the file awaits its rewrite
//	         "protos-tx" -> uint64 big endian: the id of the last
//	                      transaction Store.Update committed; if another
//	                      id is the file's last, Open empties protos
//	objects  lp(resource) member-key -> object record
//	views    lp(resource) lp(identity) lp(namespace) lp(name)
//	         lp(labelSelector) lp(fieldSelector) -> view record
//	members  view id (uint64 big endian) member-key -> empty
//	docs     key -> lp(content type) body
//	protos   lp(resource) member-key -> protobuf record (added to older
//	         files at Open)
//
// The member key of an object is "namespace/name", or "name" when it is
// cluster-scoped (see MemberKey). Member keys sort in the order the
// apiserver lists (its etcd keys end in "namespace/name" too), so List
// walks a view's members in list order, and List's after argument is
// exactly a continue position. A view's id comes from the views bucket's
// sequence and is never reused.
//
// An object record is
//
//	version byte (1) | uvarint refs | lp(resourceVersion)
//	| uvarint n, n × (lp(label key) lp(label value))
//	| uvarint m, m × (lp(field key) lp(field value))
//	| JSON body, to the end of the record
//
// with labels and fields sorted by key, so that an unchanged object encodes
// to the same bytes and a relist need not rewrite it. A protobuf record,
// under the object's key in protos, is
//
//	lp(resourceVersion) | protobuf message, to the end of the record
//
// the object as the apiserver sent it to a protobuf client (see
// Object.Proto), always at the object's resourceVersion: every write of
// the object keeps, replaces or deletes it in the same transaction. It is
// apart from the object record so that a protobuf answer reads only these
// pages, and a JSON answer only the others. refs is the number of
// views holding the object. The body of a sealed resource's object is
// sealed (seal.Key's format, bound to 'o' and the object's key), as is a
// sealed document's body (bound to 'd' and the document's key). A view
// record is
//
//	version byte (1) | uvarint id | lp(resourceVersion) | lp(kind)
//	| lp(apiVersion) | varint updated (Unix ns, 0 = unset) | flags (1 = stale)
//
// This binary form decodes several times faster than JSON would, which
// matters because List decodes every record it serves.
package store
