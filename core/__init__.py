"""What both halves of l3net share, and nothing else: the etcd key layout (keys), the user-facing
error (errors), validation at the edge (validate) and the facts about the cluster's
infrastructure (infra). ``plugin`` and ``ipam`` import it; it imports neither."""
