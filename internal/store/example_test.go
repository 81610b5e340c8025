package store_test

import (
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/outposthq/outpost/internal/store"
)

func Example() {
	dir, err := os.MkdirTemp("", "outpost")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	s, err := store.Open(filepath.Join(dir, "cache.db"), store.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer s.Close()

	// kubelet listed its pods...
	kubelet := store.ViewKey{Identity: "system:node:edge-1", Resource: "/v1/pods", FieldSelector: "spec.nodeName=edge-1"}
	pod := func(name, rv, node string) store.Object {
		return store.Object{
			Namespace: "default", Name: name, ResourceVersion: rv,
			Fields: map[string]string{"metadata.name": name, "metadata.namespace": "default", "spec.nodeName": node},
			Data:   []byte(`{"kind":"Pod"}`),
		}
	}
	err = s.ReplaceView(store.View{Key: kubelet, ResourceVersion: "100", Kind: "PodList", APIVersion: "v1"},
		[]store.Object{pod("web-1", "90", "edge-1")})
	if err != nil {
		log.Fatal(err)
	}
	// ...then another component's unfiltered watch saw a pod scheduled to
	// edge-1: kubelet's view takes it in.
	admin := store.ViewKey{Identity: "admin", Resource: "/v1/pods"}
	err = s.Apply([]store.Event{{Type: store.Added, View: admin, Object: pod("web-2", "101", "edge-1")}})
	if err != nil {
		log.Fatal(err)
	}

	// Offline, kubelet's list is answered from its view.
	err = s.List(kubelet, "", 0, func(o store.Object) error {
		fmt.Println(store.MemberKey(o.Namespace, o.Name), o.ResourceVersion)
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}
	// Output:
	// default/web-1 90
	// default/web-2 101
}
