"""Several hosts on shared storage: allocations unique across a cluster, in etcd.

Enabled by the host config's ``[cluster]`` table (:mod:`svirt.config`).  The
host-wide claims (:mod:`svirt.launcher.claims`) still decide on the host;
the cluster only decides uniqueness between hosts:

``etcd.py``    the etcd v3 client: ``etcd3gw`` (the gRPC gateway's JSON API)
               over every configured endpoint in turn; a transport failure on
               every one is :class:`~svirt.errors.NoQuorum`
``lease.py``   the host's lease: one per host (its id in the claims
               directory), kept alive by every svirt process that holds a
               guest of the host, and the fence rule when it cannot be
``claims.py``  :class:`ClusterClaims`, what a :class:`~svirt.launcher.state.Registry`
               calls: the taken keys, compare-and-swap creation of a
               record's keys under the lease, writer locks on images, release

Keys (values are JSON: host, registry, guest name, uuid, created)::

    /svirt/CLUSTER/uid/1500003          a DAC uid          (claim uid-1500003)
    /svirt/CLUSTER/mcs/c17-c942         an MCS pair        (claim mcs-c17-c942)
    /svirt/CLUSTER/smack/svirt-3        a SMACK label      (claim smack-svirt-3)
    /svirt/CLUSTER/image/SHA256         a writable image   (claim image-SHA256)
    /svirt/CLUSTER/hosts/HOST           the host, while it holds a lease
"""
