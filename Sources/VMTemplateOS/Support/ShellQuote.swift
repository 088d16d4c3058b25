import Foundation

/// Single-quotes a string for `/bin/sh` (the `exec:` migration URI runs a shell command).
package enum ShellQuote {
    package static func quote(_ text: String) -> String {
        "'" + text.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }
}
