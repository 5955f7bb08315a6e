# moved: svirt.claims.lease (re-export removed at merge)
from svirt.claims.lease import LeaseKeeper as LeaseKeeper
from svirt.claims.lease import fence_margin as fence_margin
from svirt.claims.lease import lease_of as lease_of
from svirt.claims.lease import remove_lease_file as remove_lease_file
