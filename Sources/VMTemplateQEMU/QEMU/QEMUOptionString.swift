import VMTemplateOS
import Foundation

/// QEMU's `key=value,key=value` option syntax (QemuOpts), where a literal comma in a value is
/// written `,,`. Paths are the values that need it: a store under `/srv/a,b` must still work.
package enum QEMUOptionString {
    /// Renders `type,key=value,...`; pass `type: nil` for a plain property list.
    package static func render(type: String?, _ properties: [(String, String)]) -> String {
        var parts: [String] = []
        if let type { parts.append(escape(type)) }
        for (key, value) in properties {
            parts.append("\(key)=\(escape(value))")
        }
        return parts.joined(separator: ",")
    }

    package static func escape(_ value: String) -> String {
        value.replacingOccurrences(of: ",", with: ",,")
    }
}
