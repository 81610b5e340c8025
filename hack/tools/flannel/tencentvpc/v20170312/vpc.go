// Package v20170312 declares the part of Tencent Cloud's VPC API that
// flanneld's tencentvpc backend calls, with a client whose every call
// fails: this build of flanneld has no Tencent Cloud support.
package v20170312

import "errors"

// errUnsupported is what every call answers.
var errUnsupported = errors.New("tencentvpc: this flanneld was built without Tencent Cloud's SDK")

// A Client would call the VPC API; here it only fails.
type Client struct{}

// NewClientWithSecretId returns a client that fails every call.
func NewClientWithSecretId(secretID, secretKey, region string) (*Client, error) {
	return &Client{}, nil
}

// A Filter selects route tables by a field's values.
type Filter struct {
	Name   *string
	Values []*string
}

// A Route is one route of a route table.
type Route struct {
	DestinationCidrBlock *string
	GatewayType          *string
	GatewayId            *string
	RouteId              *uint64
	RouteType            *string
	Enabled              *bool
}

// A RouteTable holds routes.
type RouteTable struct {
	RouteTableId *string
	RouteSet     []*Route
}

// DescribeRouteTablesRequest lists the route tables that match Filters.
type DescribeRouteTablesRequest struct {
	Filters []*Filter
}

// DescribeRouteTablesResponse is the answer to DescribeRouteTables.
type DescribeRouteTablesResponse struct {
	Response *struct {
		RouteTableSet []*RouteTable
	}
}

// NewDescribeRouteTablesRequest returns an empty request.
func NewDescribeRouteTablesRequest() *DescribeRouteTablesRequest {
	return &DescribeRouteTablesRequest{}
}

// DescribeRouteTables fails.
func (c *Client) DescribeRouteTables(*DescribeRouteTablesRequest) (*DescribeRouteTablesResponse, error) {
	return nil, errUnsupported
}

// CreateRoutesRequest adds Routes to a route table.
type CreateRoutesRequest struct {
	RouteTableId *string
	Routes       []*Route
}

// NewCreateRoutesRequest returns an empty request.
func NewCreateRoutesRequest() *CreateRoutesRequest { return &CreateRoutesRequest{} }

// CreateRoutes fails.
func (c *Client) CreateRoutes(*CreateRoutesRequest) (struct{}, error) {
	return struct{}{}, errUnsupported
}

// DeleteRoutesRequest removes Routes from a route table.
type DeleteRoutesRequest struct {
	RouteTableId *string
	Routes       []*Route
}

// NewDeleteRoutesRequest returns an empty request.
func NewDeleteRoutesRequest() *DeleteRoutesRequest { return &DeleteRoutesRequest{} }

// DeleteRoutes fails.
func (c *Client) DeleteRoutes(*DeleteRoutesRequest) (struct{}, error) {
	return struct{}{}, errUnsupported
}
