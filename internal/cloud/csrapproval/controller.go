package csrapproval

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	certificatesv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	certinformers "k8s.io/client-go/informers/certificates/v1"
	"k8s.io/client-go/kubernetes"
	certlisters "k8s.io/client-go/listers/certificates/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
)

// fieldManager names our writes in managedFields and audit logs.
const fieldManager = "outpost-controller"

// Event reasons on the CSR.
const (
	EventApproved = "OutpostServingCSRApproved"
	EventDenied   = "OutpostServingCSRDenied"
)

// Controller approves and denies outposts' serving CSRs (see the package
// documentation and Decide). Create it with New; Run it where it may
// decide, in the leader only.
type Controller struct {
	client        kubernetes.Interface
	clusterDomain string
	recorder      record.EventRecorder
	logger        *slog.Logger
	observe       func(Verdict)
	queue         workqueue.TypedRateLimitingInterface[string]
}

// New returns a Controller. clusterDomain is the cluster's DNS domain
// (empty means cluster.local); observe, if not nil, is called after each
// approval or denial is written (for a metric). It starts nothing.
func New(client kubernetes.Interface, clusterDomain string, recorder record.EventRecorder, logger *slog.Logger, observe func(Verdict)) *Controller {
	if clusterDomain == "" {
		clusterDomain = DefaultClusterDomain
	}
	return &Controller{
		client:        client,
		clusterDomain: clusterDomain,
		recorder:      recorder,
		logger:        logger,
		observe:       observe,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "csrapproval"}),
	}
}

// Run watches kubelet-serving CSRs and decides pending ones with one
// worker until ctx is done: CSRs are few, and a node files one every few
// days at most. It starts its own informer (the list is of one signer's
// CSRs only) and stops it on return. It returns nil when ctx is done, and
// can be called once.
func (c *Controller) Run(ctx context.Context) error {
	defer c.queue.ShutDown()
	inf := certinformers.NewFilteredCertificateSigningRequestInformer(c.client, 0, cache.Indexers{}, func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.signerName", certificatesv1.KubeletServingSignerName).String()
	})
	if err := inf.SetTransform(func(obj any) (any, error) {
		if csr, ok := obj.(*certificatesv1.CertificateSigningRequest); ok {
			csr.ManagedFields = nil
		}
		return obj, nil
	}); err != nil {
		return fmt.Errorf("watching CSRs: %w", err)
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    c.enqueue,
		UpdateFunc: func(_, obj any) { c.enqueue(obj) },
	}); err != nil {
		return fmt.Errorf("watching CSRs: %w", err)
	}
	lister := certlisters.NewCertificateSigningRequestLister(inf.GetIndexer())

	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	wg.Go(func() { inf.RunWithContext(ctx) })
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return nil // ctx done
	}
	c.logger.Info("serving CSR approval started", "signer", certificatesv1.KubeletServingSignerName, "clusterDomain", c.clusterDomain)
	wg.Go(func() {
		for c.processNext(ctx, lister) {
		}
	})
	<-ctx.Done()
	c.queue.ShutDown()
	c.logger.Info("serving CSR approval stopped")
	return nil
}

// enqueue adds a CSR still waiting for a decision.
func (c *Controller) enqueue(obj any) {
	csr, ok := obj.(*certificatesv1.CertificateSigningRequest)
	if !ok || decided(csr) {
		return
	}
	c.queue.Add(csr.Name)
}

// decided reports whether a CSR was approved or denied already.
func decided(csr *certificatesv1.CertificateSigningRequest) bool {
	for _, cond := range csr.Status.Conditions {
		if cond.Type == certificatesv1.CertificateApproved || cond.Type == certificatesv1.CertificateDenied {
			return true
		}
	}
	return false
}

func (c *Controller) processNext(ctx context.Context, lister certlisters.CertificateSigningRequestLister) bool {
	name, quit := c.queue.Get()
	if quit {
		return false
	}
	defer c.queue.Done(name)
	if err := c.sync(ctx, lister, name); err != nil {
		if ctx.Err() != nil {
			return false
		}
		if errors.Is(err, errNodeNotRegistered) {
			// Looked at again with the queue's growing back-off: soon
			// after a node registers, rarely for one that never does.
			c.logger.Debug("CSR waits for its node to register", "csr", name, "err", err)
			c.queue.AddRateLimited(name)
			return true
		}
		c.logger.Warn("deciding CSR; will retry", "csr", name, "retries", c.queue.NumRequeues(name), "err", err)
		c.queue.AddRateLimited(name)
		return true
	}
	c.queue.Forget(name)
	return true
}

// errNodeNotRegistered: a CSR that passes every check so far is for a
// Node that does not exist yet; it is looked at again later.
var errNodeNotRegistered = errors.New("node not registered yet")

// sync decides one CSR and writes the decision.
func (c *Controller) sync(ctx context.Context, lister certlisters.CertificateSigningRequestLister, name string) error {
	csr, err := lister.Get(name)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	if decided(csr) {
		return nil
	}
	d, err := Decide(csr, c.facts(ctx))
	if err != nil {
		return err
	}
	if d.Verdict == Ignore {
		c.logger.Debug("CSR not ours", "csr", name, "why", d.Reason)
		return nil
	}
	if d.Verdict == Wait {
		return fmt.Errorf("%w: %s", errNodeNotRegistered, d.Message)
	}

	condition := certificatesv1.CertificateSigningRequestCondition{
		Type:           certificatesv1.CertificateApproved,
		Status:         corev1.ConditionTrue,
		Reason:         d.Reason,
		Message:        d.Message,
		LastUpdateTime: metav1.NewTime(time.Now()),
	}
	if d.Verdict == Deny {
		condition.Type = certificatesv1.CertificateDenied
	}
	csr = csr.DeepCopy()
	csr.Status.Conditions = append(csr.Status.Conditions, condition)
	// Guarded by the resourceVersion: a CSR decided meanwhile (by another
	// approver, or by us in a previous life) is a conflict, and the retry
	// finds it decided.
	_, err = c.client.CertificatesV1().CertificateSigningRequests().UpdateApproval(ctx, name, csr, metav1.UpdateOptions{FieldManager: fieldManager})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("writing the %s condition: %w", condition.Type, err)
	}
	if c.observe != nil {
		c.observe(d.Verdict)
	}
	if d.Verdict == Approve {
		c.logger.Info("approved outpost serving CSR", "csr", name, "node", d.Node)
		c.recorder.Event(csr, corev1.EventTypeNormal, EventApproved, d.Message)
		return nil
	}
	c.logger.Warn("denied CSR for the in-cluster names of the apiserver", "csr", name, "requester", csr.Spec.Username, "reason", d.Reason, "message", d.Message)
	c.recorder.Event(csr, corev1.EventTypeWarning, EventDenied, d.Message)
	return nil
}

// facts reads the kubernetes Service and the Node live: a denial is final,
// so it must not come from a cache that has not seen a new address yet.
func (c *Controller) facts(ctx context.Context) Facts {
	return Facts{
		ClusterDomain: c.clusterDomain,
		ServiceIPs: func() ([]net.IP, error) {
			svc, err := c.client.CoreV1().Services(metav1.NamespaceDefault).Get(ctx, "kubernetes", metav1.GetOptions{})
			if err != nil {
				return nil, err
			}
			return serviceIPs(svc), nil
		},
		APIServerIPs: func() ([]net.IP, error) {
			slices, err := c.client.DiscoveryV1().EndpointSlices(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=kubernetes"})
			if err != nil {
				return nil, err
			}
			var ips []net.IP
			for _, s := range slices.Items {
				for _, e := range s.Endpoints {
					for _, a := range e.Addresses {
						if ip := net.ParseIP(a); ip != nil {
							ips = append(ips, ip)
						}
					}
				}
			}
			return ips, nil
		},
		Node: func(name string) (*corev1.Node, error) {
			n, err := c.client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return nil, nil
			}
			return n, err
		},
	}
}

// serviceIPs returns the ClusterIPs of a Service (one per IP family).
func serviceIPs(svc *corev1.Service) []net.IP {
	var ips []net.IP
	for _, s := range append([]string{svc.Spec.ClusterIP}, svc.Spec.ClusterIPs...) {
		if ip := net.ParseIP(s); ip != nil && !containsIP(ips, ip) {
			ips = append(ips, ip)
		}
	}
	return ips
}
