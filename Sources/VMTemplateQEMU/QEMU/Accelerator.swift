import VMTemplateOS
/// The accelerator a user asks for.
public enum AcceleratorChoice: String, Sendable, Codable, CaseIterable {
    case auto, kvm, tcg
}

/// The accelerator a VM runs with.
public enum Accelerator: String, Sendable, Codable, CaseIterable {
    case kvm, tcg

    /// Picks the accelerator for a choice. `auto` takes KVM only when it can run ordinary guests:
    /// a `/dev/kvm` that exists but is backed by PVM hangs stock kernels, so it does not count.
    public static func resolve(_ choice: AcceleratorChoice, kvm: KVMProbe) throws -> Accelerator {
        switch choice {
        case .tcg:
            return .tcg
        case .auto:
            return kvm.usableForStockGuests ? .kvm : .tcg
        case .kvm:
            // The same judgement as `doctor`: a /dev/kvm that hangs stock kernels (PVM) is refused
            // here at once instead of timing out at the ready marker.
            guard kvm.usableForStockGuests else {
                throw VMTemplateError(.unsupported, "KVM was asked for but cannot run ordinary guests here: \(kvm.reason) Use --accel tcg (or auto); 'vmtemplate doctor' says the same.")
            }
            return .kvm
        }
    }

    /// The `-accel` value. `tb-size` caps TCG's translation cache, the largest part of an idle
    /// clone's own memory; too small a cache slows a busy guest (see docs/benchmarks.md).
    func accelArgument(tcgTranslationCacheMiB: Int?) -> String {
        switch self {
        case .kvm:
            return "kvm"
        case .tcg:
            var properties: [(String, String)] = []
            if let tcgTranslationCacheMiB { properties.append(("tb-size", String(tcgTranslationCacheMiB))) }
            return QEMUOptionString.render(type: "tcg", properties)
        }
    }
}
