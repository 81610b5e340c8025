package framework

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"time"

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

// The web app is what the real-node tests run on a node: two WebPods that
// serve the same ConfigMap and Secret, one on the pod network and one on
// the host network, so that a test sees both kinds of pod come back.
const (
	// WebConfigMap is the ConfigMap the web pods mount, with one key,
	// "greeting"; WebSecret is the Secret, with one key, "password".
	WebConfigMap = "web-config"
	WebSecret    = "web-secret"
	// WebPodName is the web pod on the pod network, serving at its pod IP
	// on WebPodPort; WebHostName is the one on the host network, serving
	// on 127.0.0.1 at the port given to CreateWebPods.
	WebPodName  = "web-pod"
	WebHostName = "web-host"
	WebPodPort  = 8080
)

// CreateWebConfig makes namespace ns ready for pods (EnsureNamespace) and
// creates in it WebConfigMap holding greeting and WebSecret holding
// password.
func (c *ControlPlane) CreateWebConfig(ctx context.Context, ns, greeting, password string) error {
	if err := c.EnsureNamespace(ctx, ns); err != nil {
		return err
	}
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: WebConfigMap}, Data: map[string]string{"greeting": greeting}}
	if _, err := c.client.CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating the web pods' ConfigMap: %w", err)
	}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: WebSecret}, StringData: map[string]string{"password": password}}
	if _, err := c.client.CoreV1().Secrets(ns).Create(ctx, secret, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating the web pods' Secret: %w", err)
	}
	return nil
}

// CreateWebPods creates the two web pods in ns, bound to node: WebPodName
// on the pod network and WebHostName on the host network at hostPort (see
// FreePort). They mount what CreateWebConfig created.
func (c *ControlPlane) CreateWebPods(ctx context.Context, ns, node string, hostPort int) error {
	for _, pod := range []*corev1.Pod{
		WebPod(WebPodName, node, false, WebPodPort, WebConfigMap, WebSecret),
		WebPod(WebHostName, node, true, hostPort, WebConfigMap, WebSecret),
	} {
		if _, err := c.client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating pod %s/%s: %w", ns, pod.Name, err)
		}
	}
	return nil
}

// webClient reaches pods directly: the environment's proxy settings cannot
// reach pod IPs. A pod that serves answers at once.
var webClient = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil}}

// WebFile returns the content of file path in the container of the web pod
// serving at host ("ip:port"): on 127.0.0.1 for one on the host network, at
// its pod IP (through the node's bridge) for one on the pod network.
func WebFile(ctx context.Context, host, path string) (string, error) {
	body, err := GetOK(ctx, webClient, "http://"+host+"/file?path="+path)
	return string(body), err
}

// CheckWebConfig reads the mounted ConfigMap and Secret from the web pod at
// host and returns an error unless they hold greeting and password.
func CheckWebConfig(ctx context.Context, host, greeting, password string) error {
	for path, want := range map[string]string{"/etc/config/greeting": greeting, "/etc/secret/password": password} {
		got, err := WebFile(ctx, host, path)
		if err != nil {
			return fmt.Errorf("reading %s from the pod at %s: %w", path, host, err)
		}
		if got != want {
			return fmt.Errorf("%s at %s = %q, want %q", path, host, got, want)
		}
	}
	return nil
}
