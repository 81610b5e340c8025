package cache_test

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensionsclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apiextensionsinformers "k8s.io/apiextensions-apiserver/pkg/client/informers/externalversions"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/cache"
	apiregistrationv1 "k8s.io/kube-aggregator/pkg/apis/apiregistration/v1"
	aggregatorclient "k8s.io/kube-aggregator/pkg/client/clientset_generated/clientset"

	"github.com/outposthq/outpost/test/e2e/framework"
)

// TestProtobufKindsOutsideTheBuiltins: clients reading
// CustomResourceDefinitions and APIServices as protobuf, as the
// apiextensions and aggregator clientsets and their informers do, are
// recorded online (nothing counted as unrecorded) and answered the same
// offline, byte for byte for raw protobuf reads, also after outpost
// restarts offline. An answer outpost cannot record (YAML, which the
// apiserver serves on request) is counted by resource and listed at
// /debug/cache/unrecorded.
func TestProtobufKindsOutsideTheBuiltins(t *testing.T) {
	ctx := t.Context()
	token := cp.ServiceAccountToken(t, "default", "reader", framework.ReaderRole)
	applyCRD(t, "outpost.test", "Gadget", "Cluster", "outpost-test: kinds")
	o := cp.StartOutpostT(t, node)

	protoCfg := o.ClientConfig("", "", token)
	protoCfg.ContentType = runtime.ContentTypeProtobuf
	protoCfg.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	ext := apiextensionsclient.NewForConfigOrDie(protoCfg)
	agg := aggregatorclient.NewForConfigOrDie(protoCfg)
	kubeconfig := filepath.Join(t.TempDir(), "sa.kubeconfig")
	if err := o.WriteClientKubeconfig(kubeconfig, "", "", token); err != nil {
		t.Fatal(err)
	}

	reads := []read{
		{"crd list (protobuf clientset, label selector)", func(ctx context.Context) (string, error) {
			l, err := ext.ApiextensionsV1().CustomResourceDefinitions().List(ctx, metav1.ListOptions{LabelSelector: "outpost-test=kinds"})
			if err != nil {
				return "", err
			}
			return names(l.Items, func(c apiextensionsv1.CustomResourceDefinition) string {
				return c.Name + ":" + c.Spec.Names.Kind + ":" + c.Spec.Versions[0].Name
			}), nil
		}},
		{"crd get (protobuf clientset)", func(ctx context.Context) (string, error) {
			c, err := ext.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, "gadgets.outpost.test", metav1.GetOptions{})
			if err != nil {
				return "", err
			}
			return c.Name + "/" + string(c.UID) + "/" + c.Spec.Group, nil
		}},
		{"crd list, byte for byte", rawProtobuf(ext.ApiextensionsV1().RESTClient(), "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")},
		{"crd get, byte for byte", rawProtobuf(ext.ApiextensionsV1().RESTClient(), "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gadgets.outpost.test")},
		{"crd informer (protobuf)", func(ctx context.Context) (string, error) {
			factory := apiextensionsinformers.NewSharedInformerFactory(ext, 0)
			inf := factory.Apiextensions().V1().CustomResourceDefinitions().Informer()
			ictx, cancel := context.WithTimeout(ctx, 20*time.Second)
			defer cancel()
			factory.Start(ictx.Done())
			defer factory.Shutdown()
			if !cache.WaitForCacheSync(ictx.Done(), inf.HasSynced) {
				return "", fmt.Errorf("CRD informer never synced")
			}
			defer cancel()
			return names(inf.GetStore().ListKeys(), func(k string) string { return k }), nil
		}},
		{"apiservice list (protobuf clientset)", func(ctx context.Context) (string, error) {
			l, err := agg.ApiregistrationV1().APIServices().List(ctx, metav1.ListOptions{})
			if err != nil {
				return "", err
			}
			return names(l.Items, func(a apiregistrationv1.APIService) string {
				return a.Name + ":" + fmt.Sprint(a.Spec.GroupPriorityMinimum)
			}), nil
		}},
		{"apiservice get, byte for byte", rawProtobuf(agg.ApiregistrationV1().RESTClient(), "/apis/apiregistration.k8s.io/v1/apiservices/v1.outpost.test")},
		{"kubectl crd (json)", func(ctx context.Context) (string, error) {
			out, err := cp.Kubectl(ctx, kubeconfig, "--cache-dir", t.TempDir(), "get", "crd", "gadgets.outpost.test", "-o", "jsonpath={.spec.names.plural}")
			return string(out), err
		}},
	}
	// The APIService of the CRD's group appears shortly after it is
	// established (the apiextensions controller registers it).
	if _, err := framework.Poll(ctx, 200*time.Millisecond, 30*time.Second, func(ctx context.Context) (bool, string) {
		_, err := agg.ApiregistrationV1().APIServices().Get(ctx, "v1.outpost.test", metav1.GetOptions{})
		return err == nil, fmt.Sprint(err)
	}); err != nil {
		t.Fatal(err)
	}
	online := readOnline(ctx, t, reads)
	time.Sleep(500 * time.Millisecond) // the recorder writes within 100 ms

	if n, err := o.Metric("outpost_cache_unrecorded_total", "reason=undecodable"); err != nil || n != 0 {
		t.Errorf("answers counted as undecodable online: %v %v\n%s", n, err, o.Log(20))
	}
	if got := unrecorded(t, o); len(got) != 0 {
		t.Errorf("/debug/cache/unrecorded online: %+v", got)
	}

	// YAML, which kube-apiserver answers when asked, is passed to the
	// client but not recorded: counted by resource, and listed.
	y, err := ext.ApiextensionsV1().RESTClient().Get().AbsPath("/api/v1/namespaces/default/limitranges").SetHeader("Accept", "application/yaml").DoRaw(ctx)
	if err != nil || !strings.Contains(string(y), "kind: LimitRangeList") {
		t.Fatalf("YAML list through outpost: %v %q", err, y)
	}
	if _, err := framework.Poll(ctx, 50*time.Millisecond, 5*time.Second, func(context.Context) (bool, string) {
		n, err := o.Metric("outpost_cache_unrecorded_total", "group=", "version=v1", "resource=limitranges", "reason=undecodable")
		return err == nil && n == 1, fmt.Sprint(n, err)
	}); err != nil {
		t.Errorf("the YAML answer counted: %v", err)
	}
	if got := unrecorded(t, o); len(got) != 1 || got[0].Resource != "/v1/limitranges" || got[0].Reason != "undecodable" || got[0].Error == "" {
		t.Errorf("/debug/cache/unrecorded after the YAML answer: %+v", got)
	}

	if err := cp.StopAPIServer(0); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := cp.StartAPIServer(0); err != nil {
			t.Error(err)
		}
	}()
	checkReads(ctx, t, "offline", reads, online)
	o.Stop()
	if err := o.Start(ctx); err != nil {
		t.Fatal(err)
	}
	checkReads(ctx, t, "after restart offline", reads, online)
}

// unrecordedAnswer is one row of outpost's /debug/cache/unrecorded.
type unrecordedAnswer struct {
	Resource, Reason, Error string
	Count                   int
}

// unrecorded reads outpost's /debug/cache/unrecorded.
func unrecorded(t *testing.T, o *framework.Outpost) []unrecordedAnswer {
	t.Helper()
	body, err := framework.GetOK(t.Context(), nil, o.AdminURL+"/debug/cache/unrecorded")
	if err != nil {
		t.Fatal(err)
	}
	var out []unrecordedAnswer
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatalf("/debug/cache/unrecorded: %v: %s", err, body)
	}
	return out
}
