// Module vpc stands in for Tencent Cloud's VPC SDK, which flanneld's
// tencentvpc backend imports and the Go module proxy does not serve. It
// declares only what that backend uses, and every call fails: the tests run
// flanneld with the host-gw or vxlan backend, never tencentvpc.
module github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/vpc

go 1.26.0
