package framework

import (
	"context"
	"fmt"
)

// ImportImageArchive imports the OCI archive at path (one of `make images`,
// say) into the node's containerd, in the k8s.io namespace kubelet's pods
// are run from, and checks that containerd then has the image ref, the
// fully qualified name it was imported under ("docker.io/outposthq/…"). A
// pod runs it with imagePullPolicy Never or IfNotPresent, since no registry
// is reachable.
func (n *Node) ImportImageArchive(ctx context.Context, path, ref string) error {
	ctx, cancel := n.cp.withStop(ctx)
	defer cancel()
	if err := n.importArchives(ctx, []string{path}, []string{ref}); err != nil {
		return fmt.Errorf("node %s: %w", n.Name, err)
	}
	return nil
}
