module github.com/fc93c01d/qemu

go 1.23
