"""Suite-wide setup.

A shell starts background jobs with SIGINT ignored, and then Python installs
no KeyboardInterrupt handler and passes the ignore on to every child: the
Ctrl-C tests would fail for a reason that is not ours.  Restore Python's
handler so the suite behaves the same in the foreground and the background.
"""
import signal

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
