// Package version is the build's version, set at link time by the Makefile
// (-X github.com/outposthq/outpost/internal/version.Version=...).
package version

// Version is the release or git description of this build.
var Version = "v0.0.0-dev"
