"""What a notebook shows: progress views, the status line, notices, and the runs that keep them current."""
