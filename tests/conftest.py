from tests.fixtures.sandboxes import *  # noqa: F403
from tests.fixtures.stack import *  # noqa: F403
from tests.fixtures.store import *  # noqa: F403
from tests.fixtures.temporal import *  # noqa: F403
