module ferrea.invalid/test-dns

go 1.26
