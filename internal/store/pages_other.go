//go:build !linux

package store

import bolt "go.etcd.io/bbolt"

func releasePages(*bolt.Tx) {}
