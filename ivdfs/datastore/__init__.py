"""Direct datastore access (issue 24): reading an IVD snapshot's VMDK chain from a datastore
mounted on this host, through VDDK's local-file mode, instead of through ESXi's NFC server.

`paths` maps vSphere's "[<datastore>] fcd/x.vmdk" under the directory the user named;
`descriptor` parses VMDK descriptors (pure); `identity` records what a chain's files are the
first time the mount opens it and checks, after every read, that they have not changed.
"""
