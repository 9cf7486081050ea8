"""Files: atomic writes (`atomic`) and the torch-free reader of torch.save files (`torch_file`)."""
