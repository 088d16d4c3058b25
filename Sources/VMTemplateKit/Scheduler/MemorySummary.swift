import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore
/// The store's memory at a glance: what the clones use, against what they would use as full copies.
public struct MemorySummary: Sendable, Codable, Equatable {
    public var templates: Int
    public var clones: Int
    public var running: Int
    public var paused: Int
    public var exited: Int
    public var unresponsive: Int
    public var cowBytes: UInt64
    public var privateBytes: UInt64
    /// Template pages mapped by clones, counted once per template (they are shared page cache).
    public var templateResidentBytes: UInt64
    /// cow + QEMU private + template pages once.
    public var inUseBytes: UInt64
    /// What the same live clones would use as ordinary VMs: guest RAM + QEMU private each.
    public var fullCopyBytes: UInt64

    enum CodingKeys: String, CodingKey {
        case templates, clones, running, paused, exited, unresponsive
        case cowBytes = "cow_bytes"
        case privateBytes = "private_bytes"
        case templateResidentBytes = "template_resident_bytes"
        case inUseBytes = "in_use_bytes"
        case fullCopyBytes = "full_copy_bytes"
    }

    public init(templates: [TemplateManifest], clones: [CloneView]) {
        self.templates = templates.count
        self.clones = clones.count
        running = clones.filter { $0.state == .running }.count
        paused = clones.filter { $0.state == .paused }.count
        exited = clones.filter { $0.state == .exited }.count
        unresponsive = clones.filter { $0.state == .unresponsive }.count
        let live = clones.filter { $0.state != .exited }
        cowBytes = Admission.saturatingSum(live.compactMap(\.cowBytes))
        privateBytes = Admission.saturatingSum(live.compactMap(\.privateBytes))
        var residentByTemplate: [String: UInt64] = [:]
        for clone in live {
            residentByTemplate[clone.template] = max(residentByTemplate[clone.template] ?? 0, clone.templateResidentBytes ?? 0)
        }
        templateResidentBytes = Admission.saturatingSum(Array(residentByTemplate.values))
        inUseBytes = Admission.saturatingSum([cowBytes, privateBytes, templateResidentBytes])
        let guestMemory = Dictionary(templates.map { ($0.name, $0.machine.memoryBytes) }, uniquingKeysWith: { first, _ in first })
        fullCopyBytes = Admission.saturatingSum(live.flatMap { [guestMemory[$0.template] ?? 0, $0.privateBytes ?? 0] })
    }
}
