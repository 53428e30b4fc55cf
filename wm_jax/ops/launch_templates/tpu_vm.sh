cd $repo && WM_DISTRIBUTED=auto $train_command
