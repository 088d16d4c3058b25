import Foundation
import VMTemplateOS
import VMTemplateQEMU

/// A NIC or disk as the API takes it: a JSON object with the fields `--nic`/`--disk` take as
/// `key=value` (the string form is the CLI's: ``spec(_:)`` is how the CLI's options arrive). An
/// object is written out in the CLI's grammar and parsed by the same parser, so both are checked by
/// one piece of code; a value that would change the grammar (a `,`, or an `=` where none belongs)
/// is refused first.
public enum DeviceObject: Sendable, Equatable, Decodable {
    case spec(String)
    case fields([(String, String)])

    public static func == (lhs: DeviceObject, rhs: DeviceObject) -> Bool { lhs.specText(kind: "") == rhs.specText(kind: "") }

    struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public init(from decoder: any Decoder) throws {
        if (try? decoder.singleValueContainer().decode(String.self)) != nil {
            throw VMTemplateError(.invalidArgument, "give each NIC and disk as an object, e.g. {\"backend\": \"user\"} or {\"path\": \"/srv/disk.img\", \"readonly\": true} (docs/api.md): the spec strings are the CLI's.")
        }
        let container = try decoder.container(keyedBy: Key.self)
        var fields: [(String, String)] = []
        for key in container.allKeys.sorted(by: { $0.stringValue < $1.stringValue }) {
            if let text = try? container.decode(String.self, forKey: key) {
                fields.append((key.stringValue, text))
            } else if let flag = try? container.decode(Bool.self, forKey: key) {
                fields.append((key.stringValue, flag ? "on" : "off"))
            } else if let list = try? container.decode([String].self, forKey: key), list.count <= 16 {
                fields += list.map { (key.stringValue, $0) }
            } else {
                throw VMTemplateError(.invalidArgument, "device field '\(TerminalText.escape(String(key.stringValue.prefix(40))))' must be a string, a boolean or (hostfwd) a list of strings.")
            }
        }
        self = .fields(fields)
    }

    /// The CLI's spec for this object: `backend` picks `tap=IF`, `fd=TOKEN` or `user` for a NIC
    /// (`tap` and `fd` are said by their own fields); every other field is `key=value`.
    func specText(kind: String) -> String {
        switch self {
        case .spec(let text):
            return text
        case .fields(let fields):
            var parts: [String] = []
            if kind == "nic", let backend = fields.first(where: { $0.0 == "backend" })?.1 {
                if backend == "user" { parts.append("user") }
                else if backend != "tap" && backend != "fd" { parts.append("backend=\(backend)") }
            }
            parts += fields.filter { $0.0 != "backend" }.map { "\($0.0)=\($0.1)" }
            return parts.joined(separator: ",")
        }
    }

    /// Refuses a field whose name or value would be read as more than one option.
    func check(kind: String) throws {
        guard case .fields(let fields) = self else { return }
        guard fields.count <= 24 else { throw VMTemplateError(.invalidArgument, "a \(kind) object has at most 24 fields.") }
        for (key, value) in fields {
            let shown = TerminalText.escape(String(value.prefix(60)))
            guard !key.contains(","), !key.contains("="), !value.contains(","), key == "hostfwd" || !value.contains("=") else {
                throw VMTemplateError(.invalidArgument, "\(kind) field \(TerminalText.escape(String(key.prefix(40)))) '\(shown)' holds ',' or '=', which no \(kind) field may: give each setting as a field of its own.")
            }
        }
    }

    /// Whether the object names a descriptor its caller handed over (`fd`), so that the server
    /// opens nothing for it: the parser refuses `fd` beside a path, a tap name, a namespace or a
    /// user-mode backend.
    public var isGivenDescriptor: Bool {
        guard case .fields(let fields) = self else { return false }
        return fields.contains { $0.0 == "fd" }
    }

    /// The device request for these NICs and disks, checked like `--nic` and `--disk`; `fd`
    /// fields are found with `descriptors`.
    public static func request(nics: [DeviceObject], disks: [DeviceObject], descriptors: DescriptorLookup = .none) throws -> DeviceRequest {
        try nics.forEach { try $0.check(kind: "nic") }
        try disks.forEach { try $0.check(kind: "disk") }
        return try DeviceRequest(parsingNICs: nics.map { $0.specText(kind: "nic") }, disks: disks.map { $0.specText(kind: "disk") }, descriptors: descriptors)
    }
}
