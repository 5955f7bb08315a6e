# moved: svirt.claims.cluster (re-export removed at merge)
from svirt.claims.cluster import CLUSTER_TRIES as CLUSTER_TRIES
from svirt.claims.cluster import KINDS as KINDS
from svirt.claims.cluster import ClusterClaims as ClusterClaims
