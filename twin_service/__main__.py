from twin_service.cli import main

raise SystemExit(main())
