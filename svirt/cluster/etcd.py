# moved: svirt.claims.etcd (re-export removed at merge)
from svirt.claims.etcd import Etcd as Etcd
from svirt.claims.etcd import KeyValue as KeyValue
from svirt.claims.etcd import LeaseGone as LeaseGone
from svirt.claims.etcd import dumps as dumps
from svirt.claims.etcd import loads as loads
