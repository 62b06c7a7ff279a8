"""Pure ``nn.Module`` definitions built from small frozen configs."""
