from shufflefs.cli import main

raise SystemExit(main())
