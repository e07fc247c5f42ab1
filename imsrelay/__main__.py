from imsrelay.cli import main

raise SystemExit(main())
