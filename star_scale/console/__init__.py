"""What people read: progress that suits the terminal or the log file it goes to."""
