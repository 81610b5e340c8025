package framework

import (
	"context"
	"fmt"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// CreateNode creates a Node object called name, with annotations, that no
// kubelet runs (kwok may, see KwokNodeAnnotation): the Node authorizer then
// lets the node's credentials read what pods bound to it use. The Node is
// deleted when t ends.
func (c *ControlPlane) CreateNode(t testing.TB, name string, annotations map[string]string) {
	t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: annotations}}
	if _, err := c.client.CoreV1().Nodes().Create(t.Context(), n, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating node %s: %v", name, err)
	}
	t.Cleanup(func() {
		// t.Context is already cancelled during cleanup.
		_ = c.client.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{})
	})
}

// ReaderRole is a ClusterRole that gets, lists and watches everything,
// which ServiceAccountToken creates when asked for it. The bootstrap "view"
// role would do for most, but it is aggregated by kube-controller-manager,
// which most suites do not run, and it leaves out secrets.
const ReaderRole = "outpost-e2e:reader"

// ServiceAccountToken creates service account ns/name (unless it exists),
// binds it to clusterRole (ReaderRole, or a bootstrap role such as
// cluster-admin; "" binds nothing) and waits until the authorizer counts
// the binding, then returns a fresh two-hour token of the account. Any
// failure fails t.
func (c *ControlPlane) ServiceAccountToken(t testing.TB, ns, name, clusterRole string) string {
	t.Helper()
	ctx := t.Context()
	if clusterRole == ReaderRole {
		role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: ReaderRole},
			Rules: []rbacv1.PolicyRule{{APIGroups: []string{"*"}, Resources: []string{"*"}, Verbs: []string{"get", "list", "watch"}}}}
		if _, err := c.client.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatalf("creating cluster role %s: %v", ReaderRole, err)
		}
	}
	// Every role above lets its holder list configmaps.
	if err := c.bindServiceAccount(ctx, ns, name, clusterRole, "outpost-e2e:"+ns+":"+name+":"+clusterRole,
		authorizationv1.ResourceAttributes{Verb: "list", Resource: "configmaps"}); err != nil {
		t.Fatal(err)
	}
	exp := int64(7200)
	tr, err := c.client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, name,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token for %s/%s: %v", ns, name, err)
	}
	return tr.Status.Token
}

// bindServiceAccount creates service account ns/name if it is missing,
// and unless clusterRole is "" binds it to clusterRole (binding names the
// ClusterRoleBinding) and waits until the authorizer allows the account
// what allowed asks: RBAC is cached by the authorizer, so a new binding
// counts only once its informers have seen it.
func (c *ControlPlane) bindServiceAccount(ctx context.Context, ns, name, clusterRole, binding string, allowed authorizationv1.ResourceAttributes) error {
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if _, err := c.client.CoreV1().ServiceAccounts(ns).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating service account %s/%s: %w", ns, name, err)
	}
	if clusterRole == "" {
		return nil
	}
	crb := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: binding},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: clusterRole},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: ns, Name: name}},
	}
	if _, err := c.client.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("binding %s/%s to %s: %w", ns, name, clusterRole, err)
	}
	return c.WaitAllowed(ctx, authorizationv1.SubjectAccessReviewSpec{
		User:               "system:serviceaccount:" + ns + ":" + name,
		Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
		ResourceAttributes: &allowed,
	})
}

// WaitAllowed waits up to 10 s until the apiserver's authorizer allows what
// review asks (a SubjectAccessReview): a new RBAC binding counts only once
// the authorizer's informers have seen it.
func (c *ControlPlane) WaitAllowed(ctx context.Context, review authorizationv1.SubjectAccessReviewSpec) error {
	sar := &authorizationv1.SubjectAccessReview{Spec: review}
	_, err := Poll(ctx, 100*time.Millisecond, 10*time.Second, func(ctx context.Context) (bool, string) {
		r, err := c.client.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
		if err != nil {
			return false, err.Error()
		}
		return r.Status.Allowed, r.Status.Reason
	})
	if err != nil {
		return fmt.Errorf("waiting until %s is allowed %s: %w", review.User, describeAttributes(review.ResourceAttributes), err)
	}
	return nil
}

func describeAttributes(a *authorizationv1.ResourceAttributes) string {
	if a == nil {
		return "its request"
	}
	what := a.Verb + " " + a.Resource
	if a.Group != "" {
		what += "." + a.Group
	}
	if a.Namespace != "" {
		what += " in " + a.Namespace
	}
	return "to " + what
}
