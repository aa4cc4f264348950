"""l3net IPAM: pools shared by all hosts, blocks claimed per host, CAS allocation in etcd."""
