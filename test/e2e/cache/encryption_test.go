package cache_test

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"os"
	"path/filepath"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// TestEncryptionAtRest: with --encryption-key-file, a Secret and a
// service-account token that kubelet read through outpost are nowhere in
// the cache file, in clear or base64, yet are served offline after a
// restart; without the flag the same check finds them (so it can fail).
// The cache file and the data dir are private to their owner either way.
func TestEncryptionAtRest(t *testing.T) {
	ctx := t.Context()
	const ns = "at-rest"
	c := cp.Client()
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "app"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, encrypted := range []bool{true, false} {
		name := "plain"
		if encrypted {
			name = "encrypted"
		}
		t.Run(name, func(t *testing.T) {
			atRest(t, ns, "edge-"+name, encrypted)
		})
	}
}

func atRest(t *testing.T, ns, node string, encrypted bool) {
	ctx := t.Context()
	c := cp.Client()
	// A value found nowhere else, not even in another run.
	value := "at-rest-" + node + "-" + rand.Text()
	secretName := "creds-" + node
	if _, err := c.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: secretName},
		Data: map[string][]byte{"password": []byte(value)}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// kubelet may read the Secret, and ask for the account's tokens, only
	// for a pod bound to its node that uses them (the Node authorizer).
	pod, err := c.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "app-" + node},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: "app",
			Containers: []corev1.Container{{Name: "c", Image: "example/app:1"}},
			Volumes: []corev1.Volume{{Name: "creds", VolumeSource: corev1.VolumeSource{
				Secret: &corev1.SecretVolumeSource{SecretName: secretName}}}}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}

	var args []string
	if encrypted {
		keyFile := filepath.Join(t.TempDir(), "outpost.key")
		key := make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(keyFile, []byte(base64.StdEncoding.EncodeToString(key)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--encryption-key-file="+keyFile)
	}
	o := cp.StartOutpostT(t, node, args...)
	kubelet := kubernetes.NewForConfigOrDie(o.ClientConfig(o.NodeCertFile, o.NodeKeyFile, ""))

	// Online, as kubelet starting the pod: the Secret and a bound token.
	var got *corev1.Secret
	deadline := time.Now().Add(20 * time.Second)
	for {
		// The Node authorizer learns of the pod from its own informer.
		got, err = kubelet.CoreV1().Secrets(ns).Get(ctx, secretName, metav1.GetOptions{})
		if err == nil || !apierrors.IsForbidden(err) || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil || string(got.Data["password"]) != value {
		t.Fatalf("online get of the Secret: %v (right value: %v)", err, err == nil && string(got.Data["password"]) == value)
	}
	exp := int64(3600)
	tokenRequest := func() (*authenticationv1.TokenRequest, error) {
		return kubelet.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "app", &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
			Audiences: []string{"at-rest"}, ExpirationSeconds: &exp,
			BoundObjectRef: &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}}}, metav1.CreateOptions{})
	}
	tr, err := tokenRequest()
	if err != nil {
		t.Fatalf("online TokenRequest: %v", err)
	}
	token := tr.Status.Token
	time.Sleep(500 * time.Millisecond) // the recorder writes within 100 ms
	o.Stop()

	dbPath := filepath.Join(o.DataDir, "cache.db")
	raw, err := os.ReadFile(dbPath)
	if err != nil {
		t.Fatal(err)
	}
	forms := []struct {
		what, s string
		inClear bool // how an unencrypted cache holds it
	}{
		{"the Secret's value", value, false}, // JSON holds Secret data in base64
		{"the Secret's value in base64", base64.StdEncoding.EncodeToString([]byte(value)), true},
		{"the token", token, true},
		{"the token's signature", token[len(token)-40:], true},
	}
	for _, f := range forms {
		found := bytes.Contains(raw, []byte(f.s))
		if encrypted && found {
			t.Errorf("%s is in the encrypted cache file %s", f.what, dbPath)
		}
		// So that the check above can fail.
		if !encrypted && f.inClear && !found {
			t.Errorf("%s is not in the unencrypted cache file %s", f.what, dbPath)
		}
	}
	for path, want := range map[string]os.FileMode{o.DataDir: 0o700, dbPath: 0o600} {
		if info, err := os.Stat(path); err != nil || info.Mode().Perm() != want {
			t.Errorf("%s: mode %v, %v; want %v", path, info.Mode().Perm(), err, want)
		}
	}

	// Offline, after a restart: both are served from the file.
	if err := cp.StopAPIServer(0); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := cp.StartAPIServer(0); err != nil {
			t.Error(err)
		}
	}()
	if err := o.Start(ctx); err != nil {
		t.Fatal(err)
	}
	got, err = kubelet.CoreV1().Secrets(ns).Get(ctx, secretName, metav1.GetOptions{})
	if err != nil || string(got.Data["password"]) != value {
		t.Errorf("offline get of the Secret: %v (right value: %v)", err, err == nil && string(got.Data["password"]) == value)
	}
	if tr, err := tokenRequest(); err != nil || tr.Status.Token != token {
		t.Errorf("offline TokenRequest: %v (same token: %v)", err, err == nil && tr.Status.Token == token)
	}
}
