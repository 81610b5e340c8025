// Package outpost is the root of the Outpost module: an edge-autonomy layer
// for Kubernetes. The node-side gateway lives in cmd/outpost, the cloud-side
// controller in cmd/outpost-controller, and their packages under internal/.
// See ARCHITECTURE.md.
package outpost
