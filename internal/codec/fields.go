package codec

import (
	"strconv"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime"
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

// fieldSet names the field-selector values a resource has beyond
// metadata.name and metadata.namespace.
type fieldSet int

const (
	metadataFields fieldSet = iota
	podFields
	nodeFields
	secretFields
	namespaceFields
	serviceFields
	replicaFields
	jobFields
	csrFields
	eventFields
)

// fieldSetOf says which field-selector values the apiserver supports for
// resource ("group/version/resource"), from each type's field label
// conversion in kube-apiserver (pkg/apis/*/v1/conversion.go).
func fieldSetOf(resource string) fieldSet {
	group, res := splitResource(resource)
	switch {
	case group == "" && res == "pods":
		return podFields
	case group == "" && res == "nodes":
		return nodeFields
	case group == "" && res == "secrets":
		return secretFields
	case group == "" && res == "namespaces":
		return namespaceFields
	case group == "" && res == "services":
		return serviceFields
	case group == "" && res == "replicationcontrollers", group == "apps" && res == "replicasets":
		return replicaFields
	case group == "batch" && res == "jobs":
		return jobFields
	case group == "certificates.k8s.io" && res == "certificatesigningrequests":
		return csrFields
	case group == "" && res == "events":
		return eventFields
	}
	return metadataFields
}

// fields returns the field-selector values of the object for resource.
// Every type has metadata.name and metadata.namespace.
func (d *fieldsDoc) fields(resource string) map[string]string {
	f := map[string]string{"metadata.name": d.Metadata.Name, "metadata.namespace": d.Metadata.Namespace}
	switch fieldSetOf(resource) {
	case podFields:
		f["spec.nodeName"] = d.Spec.NodeName
		f["spec.restartPolicy"] = d.Spec.RestartPolicy
		f["spec.schedulerName"] = d.Spec.SchedulerName
		f["spec.serviceAccountName"] = d.Spec.ServiceAccountName
		f["spec.hostNetwork"] = strconv.FormatBool(d.Spec.HostNetwork)
		f["status.phase"] = d.Status.Phase
		f["status.podIP"] = d.Status.PodIP
		f["status.nominatedNodeName"] = d.Status.NominatedNodeName
	case nodeFields:
		f["spec.unschedulable"] = strconv.FormatBool(d.Spec.Unschedulable)
	case secretFields:
		f["type"] = d.Type
	case namespaceFields:
		f["status.phase"] = d.Status.Phase
	case serviceFields:
		f["spec.clusterIP"] = d.Spec.ClusterIP
		f["spec.type"] = d.Spec.Type
	case replicaFields:
		f["status.replicas"] = strconv.FormatInt(d.Status.Replicas, 10)
	case jobFields:
		f["status.successful"] = strconv.FormatInt(d.Status.Succeeded, 10)
	case csrFields:
		f["spec.signerName"] = d.Spec.SignerName
	case eventFields:
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

// typedFieldsDoc fills a fieldsDoc from a typed object (one decoded from
// protobuf) as decoding the object's JSON would, which costs far more. ok
// is false when it cannot vouch for that: the object's type is not the one
// whose fields the resource selects on. The caller then decodes the JSON.
func typedFieldsDoc(obj runtime.Object, resource string) (d fieldsDoc, ok bool) {
	m, err := meta.Accessor(obj)
	if err != nil {
		return d, false
	}
	d.Metadata.Name, d.Metadata.Namespace = m.GetName(), m.GetNamespace()
	d.Metadata.ResourceVersion, d.Metadata.Labels = m.GetResourceVersion(), m.GetLabels()
	set := fieldSetOf(resource)
	if set == metadataFields {
		return d, true
	}
	var has fieldSet
	switch o := obj.(type) {
	case *corev1.Pod:
		has = podFields
		d.Spec.NodeName, d.Spec.RestartPolicy = o.Spec.NodeName, string(o.Spec.RestartPolicy)
		d.Spec.SchedulerName, d.Spec.ServiceAccountName = o.Spec.SchedulerName, o.Spec.ServiceAccountName
		d.Spec.HostNetwork = o.Spec.HostNetwork
		d.Status.Phase, d.Status.PodIP, d.Status.NominatedNodeName = string(o.Status.Phase), o.Status.PodIP, o.Status.NominatedNodeName
	case *corev1.Node:
		has = nodeFields
		d.Spec.Unschedulable = o.Spec.Unschedulable
	case *corev1.Secret:
		has = secretFields
		d.Type = string(o.Type)
	case *corev1.Namespace:
		has = namespaceFields
		d.Status.Phase = string(o.Status.Phase)
	case *corev1.Service:
		has = serviceFields
		d.Spec.ClusterIP, d.Spec.Type = o.Spec.ClusterIP, string(o.Spec.Type)
	case *corev1.ReplicationController:
		has = replicaFields
		d.Status.Replicas = int64(o.Status.Replicas)
	case *appsv1.ReplicaSet:
		has = replicaFields
		d.Status.Replicas = int64(o.Status.Replicas)
	case *batchv1.Job:
		has = jobFields
		d.Status.Succeeded = int64(o.Status.Succeeded)
	case *certificatesv1.CertificateSigningRequest:
		has = csrFields
		d.Spec.SignerName = o.Spec.SignerName
	case *corev1.Event:
		has = eventFields
		d.Type, d.Reason, d.ReportingComp, d.Source.Component = o.Type, o.Reason, o.ReportingController, o.Source.Component
		io := o.InvolvedObject
		d.InvolvedObject.Kind, d.InvolvedObject.Namespace, d.InvolvedObject.Name = io.Kind, io.Namespace, io.Name
		d.InvolvedObject.UID, d.InvolvedObject.APIVersion = string(io.UID), io.APIVersion
		d.InvolvedObject.ResourceVersion, d.InvolvedObject.FieldPath = io.ResourceVersion, io.FieldPath
	}
	return d, has == set
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
