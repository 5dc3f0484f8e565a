"""`python -m chatterbox_serverless.testing serve|worker OPTIONS`: the real command with FakeEngineForTests."""
import sys

from . import main

sys.exit(main())
