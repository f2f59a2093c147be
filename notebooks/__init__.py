"""The notebooks shipped with sae_widgets (a regular package so that editable installs can find them too)."""
