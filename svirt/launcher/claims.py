# moved: svirt.claims.host, svirt.claims.owner (re-export removed at merge)
from svirt.claims.host import CLAIMS_DIR as CLAIMS_DIR
from svirt.claims.host import ClaimSession as ClaimSession
from svirt.claims.host import HostClaims as HostClaims
from svirt.claims.host import default_claims_dir as default_claims_dir
from svirt.claims.host import valid_key as valid_key
from svirt.claims.owner import Owner as Owner
