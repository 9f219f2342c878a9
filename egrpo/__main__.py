from egrpo.cli import main

raise SystemExit(main())
