// Package cache_test proves outpost's cache end to end: reads recorded
// online through outpost are answered the same way once the apiserver is
// gone, and again after outpost itself restarts while it is still gone.
package cache_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/outposthq/outpost/test/e2e/framework"
)

var cp *framework.ControlPlane

func TestMain(m *testing.M) {
	os.Exit(framework.Run(m, framework.Options{}, &cp))
}

const node = "edge-1"

var widgets = schema.GroupVersionResource{Group: "example.com", Version: "v1", Resource: "widgets"}

// seed creates three namespaces of labelled objects, pods on two nodes and
// CRD instances.
func seed(t *testing.T) {
	ctx := t.Context()
	c := cp.Client()
	for _, n := range []string{node, "edge-2"} {
		cp.CreateNode(t, n, nil)
	}
	for _, ns := range []string{"a", "b", "c"} {
		if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		// No kube-controller-manager here: pods need the default account.
		if _, err := c.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		for i := range 6 {
			tier := []string{"front", "back"}[i%2]
			cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("cm-%d", i), Labels: map[string]string{"tier": tier, "idx": fmt.Sprint(i)}},
				Data: map[string]string{"v": ns + fmt.Sprint(i)}}
			if _, err := c.CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		for i := range 2 {
			s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("secret-%d", i), Labels: map[string]string{"tier": "front"}},
				StringData: map[string]string{"k": "s" + ns}}
			if _, err := c.CoreV1().Secrets(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Labels: map[string]string{"tier": "front"}},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}}}
		if _, err := c.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		for i := range 4 {
			nodeName := []string{node, "edge-2"}[i%2]
			pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("pod-%d", i), Labels: map[string]string{"app": "web"}},
				Spec: corev1.PodSpec{NodeName: nodeName, Containers: []corev1.Container{{Name: "c", Image: "example/web:1"}},
					Volumes: []corev1.Volume{{Name: "cfg", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
						LocalObjectReference: corev1.LocalObjectReference{Name: "cm-0"}}}}}}}
			if _, err := c.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	// A CRD and instances of it.
	applyCRD(t, widgets.Group, "Widget", "Namespaced", "")
	dyn := dynamic.NewForConfigOrDie(cp.AdminConfig())
	deadline := time.Now().Add(30 * time.Second)
	for i := 0; i < 3; {
		w := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "example.com/v1", "kind": "Widget",
			"metadata": map[string]any{"name": fmt.Sprintf("w-%d", i)}, "size": int64(i)}}
		_, err := dyn.Resource(widgets).Namespace("a").Create(ctx, w, metav1.CreateOptions{})
		if err == nil {
			i++
			continue
		}
		if time.Now().After(deadline) {
			t.Fatalf("creating widget: %v", err)
		}
		time.Sleep(200 * time.Millisecond) // discovery of the new type settles
	}
}

// applyCRD creates a CustomResourceDefinition for kind in group (plural:
// kind in lower case plus "s"), with labels (YAML flow entries such as
// "a: b", or none) and one version, v1, without a schema so that every
// field is kept, and waits until it is established.
func applyCRD(t *testing.T, group, kind, scope, labels string) {
	t.Helper()
	singular := strings.ToLower(kind)
	name := singular + "s." + group
	file := filepath.Join(t.TempDir(), "crd.yaml")
	if err := os.WriteFile(file, fmt.Appendf(nil, crdYAML, name, labels, group, scope, singular, kind), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := cp.Kubectl(t.Context(), "", "apply", "-f", file); err != nil {
		t.Fatalf("creating CRD %s: %v\n%s", name, err, out)
	}
	if out, err := cp.Kubectl(t.Context(), "", "wait", "--for=condition=Established", "crd/"+name, "--timeout=30s"); err != nil {
		t.Fatalf("waiting for CRD %s: %v\n%s", name, err, out)
	}
}

// crdYAML is applyCRD's CustomResourceDefinition: name, labels, group,
// scope, singular and kind to fill in.
const crdYAML = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: %[1]s
  labels: {%[2]s}
spec:
  group: %[3]s
  scope: %[4]s
  names: {plural: %[5]ss, singular: %[5]s, kind: %[6]s, listKind: %[6]sList}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
`

func TestReadsSurviveTheCut(t *testing.T) {
	ctx := t.Context()
	seed(t)
	token := cp.ServiceAccountToken(t, "default", "reader", framework.ReaderRole)
	o := cp.StartOutpostT(t, node, "--log-level=debug")

	saCfg := o.ClientConfig("", "", token)
	protoCfg := rest.CopyConfig(saCfg)
	protoCfg.ContentType = runtime.ContentTypeProtobuf
	protoCfg.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	nodeCfg := o.ClientConfig(o.NodeCertFile, o.NodeKeyFile, "")
	nodeCfg.ContentType = runtime.ContentTypeProtobuf
	nodeCfg.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	sa := kubernetes.NewForConfigOrDie(saCfg)
	saProto := kubernetes.NewForConfigOrDie(protoCfg)
	kubelet := kubernetes.NewForConfigOrDie(nodeCfg)
	meta := metadata.NewForConfigOrDie(saCfg)
	dyn := dynamic.NewForConfigOrDie(saCfg)
	tokenKubeconfig := filepath.Join(t.TempDir(), "sa.kubeconfig")
	if err := o.WriteClientKubeconfig(tokenKubeconfig, "", "", token); err != nil {
		t.Fatal(err)
	}
	kubectl := func(args ...string) func(ctx context.Context) (string, error) {
		return func(ctx context.Context) (string, error) {
			// A fresh discovery cache each time: discovery must come from outpost.
			args := append([]string{"--cache-dir", t.TempDir()}, args...)
			out, err := cp.Kubectl(ctx, tokenKubeconfig, args...)
			return string(out), err
		}
	}

	// An informer (as the SA) over every configmap: its view is what a
	// broader-view read is filtered from later.
	factory := informers.NewSharedInformerFactory(sa, 0)
	cmInformer := factory.Core().V1().ConfigMaps().Informer()
	ictx, stopInformer := context.WithCancel(ctx)
	factory.Start(ictx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), cmInformer.HasSynced) {
		t.Fatal("informer never synced")
	}
	stopInformer()
	factory.Shutdown()

	reads := []read{
		{"kubectl label selector", kubectl("get", "configmaps", "-A", "-l", "tier=front", "-o", "name")},
		{"kubectl field selector on pods", kubectl("get", "pods", "-A", "--field-selector", "spec.nodeName=edge-1", "-o", "name")},
		{"kubectl pagination", kubectl("get", "secrets", "-n", "b", "--chunk-size=1", "-o", "name")},
		{"kubectl table", kubectl("get", "services", "-A")},
		{"kubectl crd", kubectl("get", "widgets", "-n", "a", "-o", "jsonpath={range .items[*]}{.metadata.name}={.size} {end}")},
		{"kubectl get one", kubectl("get", "configmap", "cm-3", "-n", "c", "-o", "jsonpath={.data.v}")},
		{"kubectl discovery", kubectl("api-resources", "-o", "name")},
		{"protobuf list", func(ctx context.Context) (string, error) {
			l, err := saProto.CoreV1().Services("").List(ctx, metav1.ListOptions{})
			if err != nil {
				return "", err
			}
			return names(l.Items, func(s corev1.Service) string {
				return s.Namespace + "/" + s.Name + ":" + fmt.Sprint(s.Spec.Ports[0].Port)
			}), nil
		}},
		// Protobuf answers offline are the apiserver's own bytes: each
		// object as it sent it, in the same envelope.
		{"protobuf list, byte for byte", rawProtobuf(saProto.CoreV1().RESTClient(), "/api/v1/namespaces/c/configmaps")},
		{"protobuf get, byte for byte", rawProtobuf(saProto.CoreV1().RESTClient(), "/api/v1/namespaces/c/configmaps/cm-3")},
		{"metadata-only list", func(ctx context.Context) (string, error) {
			l, err := meta.Resource(corev1.SchemeGroupVersion.WithResource("configmaps")).Namespace("b").List(ctx, metav1.ListOptions{LabelSelector: "tier=back"})
			if err != nil {
				return "", err
			}
			var out []string
			for _, it := range l.Items {
				out = append(out, it.Name+":"+it.Labels["idx"])
			}
			sort.Strings(out)
			return strings.Join(out, " "), nil
		}},
		{"kubelet pods (protobuf, field selector)", func(ctx context.Context) (string, error) {
			l, err := kubelet.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
			if err != nil {
				return "", err
			}
			return names(l.Items, func(p corev1.Pod) string { return p.Namespace + "/" + p.Name + "@" + p.Spec.NodeName }), nil
		}},
		{"kubelet node", func(ctx context.Context) (string, error) {
			n, err := kubelet.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
			if err != nil {
				return "", err
			}
			return n.Name + "/" + string(n.UID), nil
		}},
		{"dynamic crd get", func(ctx context.Context) (string, error) {
			w, err := dyn.Resource(widgets).Namespace("a").Get(ctx, "w-2", metav1.GetOptions{})
			if err != nil {
				return "", err
			}
			return fmt.Sprint(w.GetName(), w.Object["size"]), nil
		}},
	}
	online := readOnline(ctx, t, reads)
	time.Sleep(500 * time.Millisecond) // let the recorder write (it batches within 100 ms)

	// The broader view: never asked through outpost online, answered from
	// the informer's view of every configmap, filtered by outpost.
	broaderOf := func(c kubernetes.Interface) func(ctx context.Context) (string, error) {
		return func(ctx context.Context) (string, error) {
			l, err := c.CoreV1().ConfigMaps("b").List(ctx, metav1.ListOptions{LabelSelector: "tier=back,idx!=5"})
			if err != nil {
				return "", err
			}
			return names(l.Items, func(c corev1.ConfigMap) string { return c.Name + "=" + c.Data["v"] }), nil
		}
	}
	broader := broaderOf(sa)
	wantBroader, err := broaderOf(cp.Client())(ctx)
	if err != nil || wantBroader == "" {
		t.Fatalf("direct broader read: %q %v", wantBroader, err)
	}

	if b, err := framework.GetOK(ctx, nil, o.AdminURL+"/debug/cache/views"); err == nil {
		t.Logf("views at the cut: %s", b)
	}
	if err := cp.StopAPIServer(0); err != nil {
		t.Fatal(err)
	}
	check := func(phase string) {
		t.Helper()
		checkReads(ctx, t, phase, reads, online)
		if got, err := broader(ctx); err != nil || got != wantBroader {
			t.Errorf("%s broader-view read: %q, %v; want %q", phase, got, err, wantBroader)
		}
		// Never answered online for this caller: a clear 503.
		_, err := sa.CoreV1().Endpoints("a").List(ctx, metav1.ListOptions{})
		if !apierrors.IsServiceUnavailable(err) || !strings.Contains(err.Error(), "never answered online") {
			t.Errorf("%s endpoints never listed: %v; want 503 never answered online", phase, err)
		}
		// One identity never reads another's views.
		_, err = kubelet.CoreV1().ConfigMaps("a").List(ctx, metav1.ListOptions{})
		if !apierrors.IsServiceUnavailable(err) {
			t.Errorf("%s node listing configmaps it never listed (the SA did): %v; want 503", phase, err)
		}
		_, err = kubelet.CoreV1().Secrets("b").Get(ctx, "secret-0", metav1.GetOptions{})
		if !apierrors.IsServiceUnavailable(err) {
			t.Errorf("%s node reading a secret only the SA read: %v; want 503", phase, err)
		}
	}
	check("offline")
	if _, err := framework.GetOK(ctx, nil, o.AdminURL+"/readyz"); err != nil {
		t.Errorf("readyz offline with a cache: %v", err)
	}

	// Restart outpost while the apiserver is still down: same answers.
	o.Stop()
	if err := o.Start(ctx); err != nil {
		t.Fatal(err)
	}
	check("after restart offline")

	if err := cp.StartAPIServer(0); err != nil {
		t.Fatal(err)
	}
}
