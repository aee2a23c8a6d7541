import sys

from gradtail.cli.main import main

sys.exit(main())
