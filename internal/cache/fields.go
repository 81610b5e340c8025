package cache

import (
	"strconv"
	"strings"
)

// fieldsDoc is the part of an object from which field-selector values are
// read. One partial decode serves every resource below.
type fieldsDoc struct {
	Metadata struct {
		Name            string            `json:"name"`
		Namespace       string            `json:"namespace"`
		ResourceVersion string            `json:"resourceVersion"`
		Labels          map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		NodeName           string `json:"nodeName"`
		RestartPolicy      string `json:"restartPolicy"`
		SchedulerName      string `json:"schedulerName"`
		ServiceAccountName string `json:"serviceAccountName"`
		HostNetwork        bool   `json:"hostNetwork"`
		Unschedulable      bool   `json:"unschedulable"`
		ClusterIP          string `json:"clusterIP"`
		Type               string `json:"type"`
		SignerName         string `json:"signerName"`
	} `json:"spec"`
	Status struct {
		Phase             string `json:"phase"`
		PodIP             string `json:"podIP"`
		NominatedNodeName string `json:"nominatedNodeName"`
		Replicas          int64  `json:"replicas"`
		Succeeded         int64  `json:"succeeded"`
	} `json:"status"`
	Type           string `json:"type"`
	Reason         string `json:"reason"`
	ReportingComp  string `json:"reportingComponent"`
	InvolvedObject struct {
		Kind            string `json:"kind"`
		Namespace       string `json:"namespace"`
		Name            string `json:"name"`
		UID             string `json:"uid"`
		APIVersion      string `json:"apiVersion"`
		ResourceVersion string `json:"resourceVersion"`
		FieldPath       string `json:"fieldPath"`
	} `json:"involvedObject"`
	Source struct {
		Component string `json:"component"`
	} `json:"source"`
}

// fields returns the field-selector values the apiserver supports for
// resource ("group/version/resource"), from each type's field label
// conversion in kube-apiserver (pkg/apis/*/v1/conversion.go). Every type
// has metadata.name and metadata.namespace.
func (d *fieldsDoc) fields(resource string) map[string]string {
	f := map[string]string{"metadata.name": d.Metadata.Name, "metadata.namespace": d.Metadata.Namespace}
	group, res := splitResource(resource)
	switch {
	case group == "" && res == "pods":
		f["spec.nodeName"] = d.Spec.NodeName
		f["spec.restartPolicy"] = d.Spec.RestartPolicy
		f["spec.schedulerName"] = d.Spec.SchedulerName
		f["spec.serviceAccountName"] = d.Spec.ServiceAccountName
		f["spec.hostNetwork"] = strconv.FormatBool(d.Spec.HostNetwork)
		f["status.phase"] = d.Status.Phase
		f["status.podIP"] = d.Status.PodIP
		f["status.nominatedNodeName"] = d.Status.NominatedNodeName
	case group == "" && res == "nodes":
		f["spec.unschedulable"] = strconv.FormatBool(d.Spec.Unschedulable)
	case group == "" && res == "secrets":
		f["type"] = d.Type
	case group == "" && res == "namespaces":
		f["status.phase"] = d.Status.Phase
	case group == "" && res == "services":
		f["spec.clusterIP"] = d.Spec.ClusterIP
		f["spec.type"] = d.Spec.Type
	case group == "" && res == "replicationcontrollers", group == "apps" && res == "replicasets":
		f["status.replicas"] = strconv.FormatInt(d.Status.Replicas, 10)
	case group == "batch" && res == "jobs":
		f["status.successful"] = strconv.FormatInt(d.Status.Succeeded, 10)
	case group == "certificates.k8s.io" && res == "certificatesigningrequests":
		f["spec.signerName"] = d.Spec.SignerName
	case group == "" && res == "events":
		f["involvedObject.kind"] = d.InvolvedObject.Kind
		f["involvedObject.namespace"] = d.InvolvedObject.Namespace
		f["involvedObject.name"] = d.InvolvedObject.Name
		f["involvedObject.uid"] = d.InvolvedObject.UID
		f["involvedObject.apiVersion"] = d.InvolvedObject.APIVersion
		f["involvedObject.resourceVersion"] = d.InvolvedObject.ResourceVersion
		f["involvedObject.fieldPath"] = d.InvolvedObject.FieldPath
		f["reason"] = d.Reason
		f["reportingComponent"] = d.ReportingComp
		f["source"] = d.Source.Component
		f["type"] = d.Type
	}
	return f
}

// splitResource splits "group/version/resource[#suffix]" into group and
// resource.
func splitResource(resource string) (group, res string) {
	resource, _, _ = strings.Cut(resource, "#")
	parts := strings.SplitN(resource, "/", 3)
	if len(parts) != 3 {
		return "", resource
	}
	return parts[0], parts[2]
}
