// Package webhook serves Kubernetes mutating admission webhooks: it decodes
// an AdmissionReview, asks a Mutator for a JSON patch and answers with it.
//
// It also keeps the webhook's TLS material, because a webhook nobody can
// reach with a trusted certificate is a webhook that silently does nothing:
// a CA kept in a Secret (so every replica behind the Service is trusted),
// a serving certificate per replica issued from it and renewed well before
// it expires, and the CA bundle written into the MutatingWebhookConfiguration
// that calls us. The package knows nothing of what it mutates.
package webhook
