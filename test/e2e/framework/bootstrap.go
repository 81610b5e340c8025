package framework

import (
	"context"
	"crypto/rand"
	"fmt"
	"strconv"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// bootstrapGroup is the extra group of BootstrapToken, so that tests can
// tell Outpost's bootstrap identities from any other.
const bootstrapGroup = "system:bootstrappers:outpost"

// bootstrap creates what kubelet TLS bootstrap needs and kubeadm would
// otherwise create: a bootstrap token and the bindings that let its holders
// ask for node client certificates and let nodes renew their own.
// kube-controller-manager's csrapproving controller approves a CSR when its
// requester may create the matching certificatesigningrequests subresource,
// which is what these cluster roles grant.
func (c *ControlPlane) bootstrap(ctx context.Context) error {
	id, secret := lowerBase32(rand.Text()[:6]), lowerBase32(rand.Text()[:16])
	c.BootstrapToken = id + "." + secret

	// The format is fixed by the bootstrap token authenticator:
	// https://kubernetes.io/docs/reference/access-authn-authz/bootstrap-tokens/
	tokenSecret := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "bootstrap-token-" + id, Namespace: metav1.NamespaceSystem},
		Type:       corev1.SecretTypeBootstrapToken,
		StringData: map[string]string{
			"token-id":                       id,
			"token-secret":                   secret,
			"usage-bootstrap-authentication": "true",
			"usage-bootstrap-signing":        "true",
			"auth-extra-groups":              bootstrapGroup,
			"description":                    "outpost e2e bootstrap token",
		},
	}
	if _, err := c.client.CoreV1().Secrets(metav1.NamespaceSystem).Create(ctx, tokenSecret, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating bootstrap token: %w", err)
	}

	bindings := []struct{ name, group, role string }{
		{"outpost-e2e:bootstrappers:node-bootstrapper", "system:bootstrappers", "system:node-bootstrapper"},
		{"outpost-e2e:bootstrappers:nodeclient", "system:bootstrappers", "system:certificates.k8s.io:certificatesigningrequests:nodeclient"},
		{"outpost-e2e:nodes:selfnodeclient", "system:nodes", "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient"},
	}
	for _, b := range bindings {
		crb := &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: b.name},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: b.role},
			Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.GroupKind, Name: b.group}},
		}
		if _, err := c.client.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating cluster role binding %s: %w", b.name, err)
		}
	}

	// Each apiserver learns about the token from its own informer; wait
	// until all of them accept it, so a test can use it at once.
	for i := range c.ports {
		if err := c.waitTokenAccepted(ctx, i, id); err != nil {
			return err
		}
	}
	return nil
}

// waitTokenAccepted waits until apiserver i authenticates BootstrapToken as
// system:bootstrap:<id>.
func (c *ControlPlane) waitTokenAccepted(ctx context.Context, i int, id string) error {
	cfg := &rest.Config{
		Host:            c.URL(i),
		TLSClientConfig: rest.TLSClientConfig{CAFile: c.CAFile},
		BearerToken:     c.BootstrapToken,
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("building bootstrap token client: %w", err)
	}
	want := "system:bootstrap:" + id
	c.mu.Lock()
	p := c.apiservers[i]
	c.mu.Unlock()
	return waitFor(ctx, p, "bootstrap token on apiserver "+strconv.Itoa(i), func(ctx context.Context) error {
		review, err := client.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		if got := review.Status.UserInfo.Username; got != want {
			return fmt.Errorf("token authenticates as %q, want %q", got, want)
		}
		return nil
	})
}

// lowerBase32 maps rand.Text's alphabet (A-Z, 2-7) onto the one bootstrap
// tokens require ([a-z0-9]).
func lowerBase32(s string) string {
	b := []byte(s)
	for i, ch := range b {
		if ch >= 'A' && ch <= 'Z' {
			b[i] = ch - 'A' + 'a'
		}
	}
	return string(b)
}
