package framework

import (
	"strconv"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// WebPod is a pod of WebImage on node that mounts ConfigMap configMap at
// /etc/config and Secret secret at /etc/secret (and, as every pod does by
// default, a service account token) and serves them on port: on the pod
// network, or with hostNetwork on the host's 127.0.0.1 (the node's address
// is the machine's external one, which tests must not use).
func WebPod(name, node string, hostNetwork bool, port int, configMap, secret string) *corev1.Pod {
	addr := ":" + strconv.Itoa(port)
	probeHost := "" // the pod IP
	if hostNetwork {
		addr = "127.0.0.1" + addr
		probeHost = "127.0.0.1"
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{
			NodeName:    node,
			HostNetwork: hostNetwork,
			// No cluster DNS here; the host's resolv.conf will do.
			DNSPolicy:                     corev1.DNSDefault,
			EnableServiceLinks:            new(false),
			TerminationGracePeriodSeconds: new(int64(1)),
			Containers: []corev1.Container{{
				Name:            "web",
				Image:           WebImage,
				ImagePullPolicy: corev1.PullNever,
				Command:         []string{WebBinary, "-addr=" + addr},
				VolumeMounts: []corev1.VolumeMount{
					{Name: "config", MountPath: "/etc/config"},
					{Name: "secret", MountPath: "/etc/secret"},
				},
				ReadinessProbe: &corev1.Probe{
					ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
						Host: probeHost, Port: intstr.FromInt(port), Path: "/healthz",
					}},
					PeriodSeconds: 1,
				},
			}},
			Volumes: []corev1.Volume{
				{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
					LocalObjectReference: corev1.LocalObjectReference{Name: configMap},
				}}},
				{Name: "secret", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: secret}}},
			},
		},
	}
}
