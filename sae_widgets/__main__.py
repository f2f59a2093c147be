from sae_widgets.cli import main

raise SystemExit(main())
