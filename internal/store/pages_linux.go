package store

import (
	"syscall"

	bolt "go.etcd.io/bbolt"
)

// releasePages tells the kernel that this process no longer needs the
// pages of btx's file it has read: they leave its resident memory, stay in
// the page cache, and come back on the next read. After a scan of every
// page, the whole file would otherwise count in outpost's RSS. btx holds
// the memory map in place.
func releasePages(btx *bolt.Tx) {
	addr := btx.DB().Info().Data
	_, _, _ = syscall.Syscall(syscall.SYS_MADVISE, addr, uintptr(btx.Size()), syscall.MADV_DONTNEED)
}
